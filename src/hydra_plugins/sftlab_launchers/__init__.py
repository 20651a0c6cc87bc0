"""sftlab's Hydra launchers and sweeper: sweeps that resume (``sftlab.sweeps``), each job under
torchrun, SLURM through submitit.

Hydra finds plugins only in the ``hydra_plugins`` namespace package, so they live here, thin;
what a job's dir means and what to do with it is ``sftlab.sweeps``. Modules named ``_*`` are
not scanned by Hydra, and nothing heavy is imported at scan time (every Hydra start scans).
"""
