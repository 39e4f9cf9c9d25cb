"""``python -m lvforecast ...``: the same as the ``lvforecast`` console command (:mod:`lvforecast.cli`)."""

from lvforecast.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
