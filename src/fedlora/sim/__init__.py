"""The embedded federated engine: every client simulated in one process on one shared base model.

``fedlora.sim.engine.run(config)`` runs a federation; ``fedlora run CONFIG.toml`` is its command line.
Modules: ``engine`` (the round loop), ``model`` (the shared PEFT model), ``client`` (local training),
``tasks`` (task types), ``rundir`` (what a run writes), ``cli`` (``fedlora run``, ``fedlora quickstart``).
"""
