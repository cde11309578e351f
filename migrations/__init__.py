"""Alembic migrations; ``controller.db.engine.upgrade`` runs them."""
