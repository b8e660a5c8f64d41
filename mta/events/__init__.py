"""Delivery events to the sending application: the accounting log, shipped to a webhook."""

from mta.events.shipper import EventCursor, EventShipper, event_id, shippers, signature

__all__ = ["EventCursor", "EventShipper", "event_id", "shippers", "signature"]
