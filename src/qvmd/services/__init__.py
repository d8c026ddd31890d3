"""Host services that run in the services network namespace.

dnsmasq (DHCP + DNS) is built here: pure builders of its files
(`dnsmasq`), the host's upstream resolvers (`upstreams`), the port-5300
redirect (`dnsredirect`), the lease file (`leases`) and a generic child
supervisor (`supervisor`) that runs a daemon inside the namespace.
"""
