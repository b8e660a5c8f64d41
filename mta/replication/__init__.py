"""Replicated spool (issue 16): the peer channel, follower copies and the in-sync protocol.

See docs/replication.md for the design.
"""
