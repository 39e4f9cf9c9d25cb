"""The FLOP budget: pure formulas, the op-level audit, planning, the SQLite ledger, reports and the callback."""
