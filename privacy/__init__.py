"""Privacy: accounting, ledger, planner, reports, audit, and the secure-aggregation protocol math."""
