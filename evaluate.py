"""Forecast held-out systems with a trained adapter (arrives with the evaluation issue)."""

import sys


def main() -> int:
    print("evaluate.py: forecasting and the study's metrics arrive with the evaluation issue; "
          "train with `python train.py` meanwhile.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
