"""Redis ACL users for vlmq: rules in rules.py, the `vlmq acl` command in cli.py, and the
rendered file for the default prefix in vlmq.acl (every user disabled until it has a password)."""
