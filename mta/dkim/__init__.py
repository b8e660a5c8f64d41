"""DKIM signing at reception (RFC 6376, RFC 8463): every copy and retry carries the same
signed bytes."""

# Signed when present (RFC 6376 5.4.1's list, trimmed to what bulk mail carries).
DEFAULT_HEADERS = ("from", "reply-to", "subject", "date", "to", "cc", "message-id",
                   "in-reply-to", "references", "mime-version", "content-type",
                   "content-transfer-encoding", "list-id", "list-unsubscribe",
                   "list-unsubscribe-post", "sender", "feedback-id")
# Listed once more than present: a copy of these added in transit breaks the signature.
DEFAULT_OVERSIGN = ("from", "to", "subject", "date", "message-id")
