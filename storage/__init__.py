"""Persistence: durable instance files and the SQLAlchemy study index."""
