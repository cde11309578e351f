"""The edgefleet agent: the daemon on each edge box.

Installs and runs without FastAPI or SQLAlchemy (``pip install 'edgefleet[agent]'``);
inference runtimes are imported lazily.
"""

AGENT_VERSION = "0.1.0"
