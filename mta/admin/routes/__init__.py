"""The admin API's handlers, one module per resource."""

from __future__ import annotations

from aiohttp import web

from mta.admin.routes.base import Api, Resource
from mta.admin.routes.cluster import Cluster
from mta.admin.routes.delivery import Delivery
from mta.admin.routes.health import Health
from mta.admin.routes.messages import Messages
from mta.admin.routes.queue_tools import QueueTools
from mta.admin.routes.slo import Slo
from mta.admin.routes.trace import Trace

__all__ = ["Api", "register_all"]

RESOURCES: tuple[type[Resource], ...] = (Health, Cluster, Messages, QueueTools, Delivery,
                                          Slo, Trace)


def register_all(router: web.UrlDispatcher, api: Api) -> None:
    """Add the routes of every resource."""
    for resource in RESOURCES:
        resource(api).register(router)
