"""radnet.host_memory: a command line that runs models restarts itself with glibc's malloc
tunables, after which a jitted program's large temporary buffer is reused instead of being
faulted in anew at every run.

Each case runs in a fresh process through ``radnet.cli.run(..., keep_host_memory=True)``, as
``radnet.main`` does (the tunables act from a process's start; the test process keeps glibc's
defaults).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from radnet import host_memory

pytestmark = pytest.mark.skipif(not host_memory.on_glibc(), reason="the tunables are glibc's")

_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    print("started", os.getpid(), flush=True)  # twice when the program restarts itself
    import jax, jax.numpy as jnp
    from radnet import cli, host_memory

    def main(argv):
        # XLA keeps the concatenation in its temporary buffer: 192 MiB.
        def f(x):
            return jnp.sum(jnp.concatenate([x * 2, x * 3]).reshape(2, -1).T ** 2)
        x = jnp.ones((24 * 1024 * 1024,), jnp.float32)
        step = jax.jit(f)
        temp = step.lower(x).compile().memory_analysis().temp_size_in_bytes
        step(x).block_until_ready()
        faults = []
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            step(x).block_until_ready()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(json.dumps(dict(temp=temp, faults=faults, in_force=host_memory.in_force(),
                              tunables=os.environ.get("GLIBC_TUNABLES", ""), argv=argv[1:],
                              omp=os.environ.get("OMP_WAIT_POLICY"))))

    cli.run(main, keep_host_memory=True)
""")


def _run(tmp_path, env_value, tunables=None, omp=None):
    script = tmp_path / "probe.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("RADNET_HOST_MEMORY", None)
    env.pop("GLIBC_TUNABLES", None)
    env.pop("OMP_WAIT_POLICY", None)
    if omp is not None:
        env["OMP_WAIT_POLICY"] = omp
    if env_value is not None:
        env["RADNET_HOST_MEMORY"] = env_value
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    return subprocess.run([sys.executable, str(script), "extra", "args"], env=env,
                          capture_output=True, text=True, timeout=300)


def _result(proc):
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), [line for line in lines if line.startswith("started")]


def test_restart_with_tunables_reuses_the_temporary_buffer(tmp_path):
    base, starts = _result(_run(tmp_path, "system"))
    pages = base["temp"] // 4096
    # The case is meaningful: a temporary larger than glibc's other arenas (64 MiB) ...
    assert base["temp"] >= 128 * 2**20 and not base["in_force"] and len(starts) == 1
    # ... which glibc's defaults fault in anew at every run (the cost this module removes).
    assert min(base["faults"]) > pages // 2, base

    kept, starts = _result(_run(tmp_path, None))
    # One restart, same process, same arguments, the tunables in force.
    assert len(starts) == 2 and starts[0] == starts[1], starts
    assert kept["in_force"] and kept["argv"] == ["extra", "args"]
    # OpenMP's threads sleep between convolutions (set at the same start); "system" leaves
    # OpenMP's default too.
    assert kept["omp"] == "PASSIVE" and base["omp"] is None
    assert kept["temp"] == base["temp"]
    assert max(kept["faults"]) < pages // 50, kept


def test_users_own_tunables_are_kept(tmp_path):
    mine = "glibc.malloc.arena_max=2"
    res, starts = _result(_run(tmp_path, None, tunables=mine, omp="ACTIVE"))
    assert len(starts) == 2
    assert res["tunables"].split(":")[0] == mine and "glibc.malloc.arena_max=1" not in res[
        "tunables"]
    assert host_memory.tunables(mine) == res["tunables"]
    assert res["omp"] == "ACTIVE" and res["in_force"]  # the user's OpenMP policy too


def test_misspelt_setting_is_one_line_and_exit_2(tmp_path):
    proc = _run(tmp_path, "kep")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "RADNET_HOST_MEMORY" in lines[0] and "system" in lines[0], lines


def test_original_environment_undoes_what_the_restart_added():
    """bench/torch_reference.py starts PyTorch under the user's own settings: the variables
    the restart added are removed, those it changed get their old values back."""
    import json as json_lib

    saved = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "OMP_WAIT_POLICY": None}
    env = {"PATH": "/bin", host_memory.ORIGINAL_VAR: json_lib.dumps(saved),
           "GLIBC_TUNABLES": host_memory.tunables("glibc.malloc.arena_max=2"),
           "OMP_WAIT_POLICY": "PASSIVE"}
    assert host_memory.original_environment(env) == {
        "PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    # Not restarted (RADNET_HOST_MEMORY=system, or not Linux): the environment as it is.
    assert host_memory.original_environment({"PATH": "/bin"}) == {"PATH": "/bin"}
