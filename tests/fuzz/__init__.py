"""Fuzzing the SMTP ingress (test_fuzz.py runs it; MTA_FUZZ_SEED and MTA_FUZZ_ONLY replay).

settings: seed, plan and limits; model: sessions, messages, reply parsing, the SMTP state
model; client: the connection a session script drives; kinds: the session scripts; run: the
plan against one node; judge: what the replies and the spool must show.
"""
