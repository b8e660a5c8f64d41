"""Response classification and DSN (RFC 3464) generation."""
