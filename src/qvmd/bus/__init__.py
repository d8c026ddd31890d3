"""D-Bus side of qvmd: the org.qvm.Net service adapter and its clients.

`polkit` asks polkitd whether a bus sender may perform an action, and
`busdaemon` asks the bus daemon who a sender is (uid, pid).  Both send
low-level messages with a timeout on every call: dbus-fast has none by
default, and a hung polkitd must never hang (or authorize) a request.
"""
