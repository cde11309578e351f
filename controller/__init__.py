"""The edgefleet controller: registry, fleet state, API, MQTT bridge and scheduler.

Nothing is built at import time; ``controller.server`` wires the parts together.
"""
