"""radnet.compile_cache: a second process loads the compiled program instead of compiling,
and the flags of radnet.main turn the cache off or move it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A separate process per start, as a second run or a resume is; counts JAX's own events.
PROGRAM = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from radnet import compile_cache
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    compile_cache.enable(sys.argv[1], min_compile_time_s=0)
    step = jax.jit(lambda w, x: jnp.tanh(x @ w) @ w.T)
    step(jnp.ones((32, 32)), jnp.ones((4, 32))).block_until_ready()
    print(sum(e.endswith("cache_hits") for e in events),
          sum(e.endswith("cache_misses") for e in events))
""")


def _run(args, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **(env_extra or {}))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # JAX's own variable would take precedence
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_second_process_hits_the_cache(tmp_path):
    cache = tmp_path / "cache"
    hits, misses = map(int, _run(["-c", PROGRAM, str(cache)]).split())
    assert hits == 0 and misses >= 1
    assert any(cache.iterdir()), "nothing was written to the cache folder"
    hits, misses = map(int, _run(["-c", PROGRAM, str(cache)]).split())
    assert hits >= 1 and misses == 0


FLAGS_PROGRAM = textwrap.dedent("""
    import sys, jax
    from absl import flags
    from radnet import compile_cache
    flags.FLAGS(["prog", *sys.argv[1:]])
    print(compile_cache.enable_from_flags(), jax.config.jax_compilation_cache_dir)
""")


def test_flags_choose_the_folder_or_turn_it_off(tmp_path):
    chosen = tmp_path / "chosen"
    assert _run(["-c", FLAGS_PROGRAM, f"--compilation_cache_dir={chosen}"]) == \
        f"{chosen} {chosen}"
    assert chosen.is_dir()
    # Default: under XDG_CACHE_HOME; --nocompilation_cache: off.
    default = tmp_path / "xdg" / "radnet" / "jax_compilation_cache"
    assert _run(["-c", FLAGS_PROGRAM], {"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == \
        f"{default} {default}"
    assert _run(["-c", FLAGS_PROGRAM, "--nocompilation_cache"],
                {"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == "None None"
