"""python -m data_prep.volumes: the same command as python -m data_prep.build_volumes."""

from data_prep.volumes import cli

if __name__ == "__main__":
    cli.run()
