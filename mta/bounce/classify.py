"""Sort remote refusals into a few bounce classes an operator can act on."""

from __future__ import annotations

import re

__all__ = ["CLASSES", "classify"]

CLASSES = ("bad-mailbox", "inactive-mailbox", "mailbox-full", "spam-related", "policy",
           "dns-failure", "routing", "message-too-large", "other")

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_TEXT_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("dns-failure", re.compile(r"nxdomain|null mx|\bdns\b|host or domain name not found|"
                               r"domain (\S+ )?(not found|does not exist)", re.I)),
    ("spam-related", re.compile(r"spam|blocklist|blacklist|block ?list|reputation|dnsbl|"
                                r"spamhaus|junk|bulk mail", re.I)),
    ("mailbox-full", re.compile(r"quota|mailbox (is )?full|over ?quota|insufficient storage",
                                re.I)),
    ("inactive-mailbox", re.compile(r"disabled|inactive|suspended|deactivated|expired", re.I)),
    ("bad-mailbox", re.compile(r"user unknown|no such (user|mailbox|recipient)|does not exist|"
                               r"unknown (user|recipient)|invalid (recipient|mailbox)|"
                               r"recipient (address )?rejected", re.I)),
    ("message-too-large", re.compile(r"too (big|large)|size exceeds|message size", re.I)),
)
_BY_CODE = {
    (1, 1): "bad-mailbox", (1, 0): "bad-mailbox", (1, 6): "bad-mailbox",
    (1, 2): "dns-failure", (1, 10): "dns-failure", (4, 3): "dns-failure",
    (2, 1): "inactive-mailbox", (2, 2): "mailbox-full", (2, 3): "message-too-large",
    (3, 4): "message-too-large",
    (4, 0): "routing", (4, 1): "routing", (4, 2): "routing", (4, 4): "routing",
    (4, 6): "routing", (4, 7): "routing",
}


def classify(code: int, text: str) -> str:
    """A class from ``CLASSES`` for a reply like ``550 5.1.1 user unknown``."""
    for cls, pattern in _TEXT_RULES:
        if pattern.search(text):
            return cls
    if m := _ENHANCED.search(text):
        subject, detail = int(m.group(2)), int(m.group(3))
        if subject == 7:
            return "policy"
        if (cls := _BY_CODE.get((subject, detail))) is not None:
            return cls
    if code == 552:
        return "message-too-large"
    if code in (550, 551, 553):
        return "bad-mailbox"
    if code == 554:
        return "policy"
    return "other"
