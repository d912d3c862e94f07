"""Inference backends behind one interface (`agent.backends.base.Backend`)."""
