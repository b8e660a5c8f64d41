"""mta: an asyncio-native, distributed mail transfer agent."""

__version__ = "0.1.0"
