"""``python -m supervisor``: runs :func:`supervisor.cli.main`."""

from supervisor.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
