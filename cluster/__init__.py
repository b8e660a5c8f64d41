"""etcd implementation of the mta Coordinator (membership, election, shard ownership)."""
