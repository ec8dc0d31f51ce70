"""hybrid_engine inside other trainers.

    from hybrid_engine.integrations.trl import HybridEngineGRPOTrainer, HybridEngineRLOOTrainer

Each integration is its own module and imports its trainer library itself: importing this package imports none of
them (TRL is optional for users of hybrid_engine)."""
