"""Inside one stage: ``ParallelSpec`` (every degree) and ``Mesh`` (a ``GroupCoordinator`` per group, built from the
spec and passed to what needs it), collectives through each group's ``DeviceCommunicatorBase``, parallel attention,
strategies that apply a kind of parallelism to a model at load (``strategies.SequenceParallel``), the ``_sp_plan``
hooks, and the seed-compatible getters of ``state`` (a facade over the current mesh). May import ``comm``."""
