"""A small, domain-free actor runtime on trio: mailboxes, actor cells, registry, supervision, expiry, store."""
