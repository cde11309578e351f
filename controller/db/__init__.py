"""Database: the ORM models, engine construction and Alembic-driven schema."""
