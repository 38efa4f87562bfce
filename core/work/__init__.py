"""Work that outlives a click: background jobs, the run queue and its worker, sweeps."""
