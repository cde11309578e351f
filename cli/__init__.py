"""The ``edgefleet`` command line: one entry point for controller, agent and operator.

Controller and agent code is imported inside each command, so an agent-only
install never imports FastAPI or SQLAlchemy.
"""
