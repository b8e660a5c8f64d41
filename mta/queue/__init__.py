"""Scheduled queue: messages waiting for their next attempt time."""

from mta.queue.scheduler import Scheduler

__all__ = ["Scheduler"]
