"""The edgefleet wire protocol: topics, message schemas, signed envelopes, errors.

Imported by both the controller and the agent; imports neither, and nothing here
touches the network, a database or a web framework.
"""
