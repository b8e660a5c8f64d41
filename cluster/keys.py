"""The key layout under ``/mta/<cluster>/``: the one place that names every key.

| key              | written by            | value                          | lifetime      |
|------------------|-----------------------|--------------------------------|---------------|
| nodes/<id>       | each node             | msgpack {addr, admin, ...}     | node lease    |
| leader           | election txn          | node id                        | leader lease  |
| assign/<shard>   | leader                | node id                        | persistent    |
| owner/<shard>    | owner, create txn     | node id                        | owner lease   |
| drain/<id>       | operator (mtactl)     | b"1"                           | persistent    |
| rebalance        | operator (mtactl)     | requesting node id             | until leader acts |
| config/throttle/<runtime key>   | operator | "100/s"                    | persistent    |
| config/suspend/<runtime key>    | operator | b"1"                       | persistent    |
| token_base       | claiming node, txn    | decimal integer                | only raised   |
| shards           | first node, create txn | decimal shard count           | persistent    |
| replicas/<shard> | leader                | JSON list of follower ids      | persistent    |
| sync/<shard>     | owner, guarded txn    | JSON {token, owner, members}   | persistent    |

``replicas/`` and ``sync/`` exist only with ``[spool] replicas > 1`` (docs/replication.md):
``sync/<shard>`` is written by the shard's owner, in transactions guarded by its owner key
and by the record it replaces (:mod:`mta.replication.insync`).

A runtime key (see :mod:`mta.delivery.runtime`) is a domain (``example.com``), a wildcard
(``*.example.com``: its subdomains) or a site (``site:mx1.example.net``,
``site:*.suffix``, ``site:host:port``); keys written before wildcards and sites are bare
domains and read as they always did.

Per-shard keys are ``<kind>/<shard>``. A new per-shard record (the replicated spool's
placement and in-sync set, beside ``assign/`` and ``owner/``) is one more method here, one
more decoder in :mod:`cluster.store` (``_BY_KIND``) feeding one more field of the snapshot,
and written in a transaction guarded by the owner key
(:meth:`cluster.store.Transactions.guarded_by_owner`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Keys"]


@dataclass(frozen=True)
class Keys:
    """Every key of one cluster, as bytes; ``name`` is the cluster name."""

    name: str

    @property
    def prefix(self) -> bytes:
        """The cluster's whole prefix: one read of it is a snapshot."""
        return f"/mta/{self.name}/".encode()

    def _key(self, *parts: object) -> bytes:
        return self.prefix + "/".join(str(p) for p in parts).encode()

    def node(self, node: str) -> bytes:
        """Membership of ``node`` (on its lease)."""
        return self._key("nodes", node)

    @property
    def leader(self) -> bytes:
        """The elected leader's node id (on its lease)."""
        return self._key("leader")

    def assign(self, shard: int) -> bytes:
        """The node the leader assigned ``shard`` to."""
        return self._key("assign", shard)

    def owner(self, shard: int) -> bytes:
        """The node that owns ``shard`` now (on its lease); its create revision is the token's."""
        return self._key("owner", shard)

    def drain(self, node: str) -> bytes:
        """Present while ``node`` is drained."""
        return self._key("drain", node)

    @property
    def rebalance(self) -> bytes:
        """Present while an operator's rebalance request waits for the leader."""
        return self._key("rebalance")

    def throttle(self, name: str) -> bytes:
        """Cluster-wide rate of a domain or site."""
        return self._key("config", "throttle", name)

    def suspend(self, domain: str) -> bytes:
        """Present while ``domain``'s mail is held."""
        return self._key("config", "suspend", domain)

    def replicas(self, shard: int) -> bytes:
        """The nodes the leader placed copies of ``shard`` on (replicated spool)."""
        return self._key("replicas", shard)

    def sync(self, shard: int) -> bytes:
        """The in-sync record of ``shard``: its owner's token and the promotable copies."""
        return self._key("sync", shard)

    @property
    def token_base(self) -> bytes:
        """Added to an owner key's create revision to make the fencing token; only raised."""
        return self._key("token_base")

    @property
    def shards(self) -> bytes:
        """The cluster's shard count, recorded by the first node."""
        return self._key("shards")

    def relative(self, key: bytes) -> str:
        """``key`` without the prefix (``"owner/3"``)."""
        return key[len(self.prefix):].decode()
