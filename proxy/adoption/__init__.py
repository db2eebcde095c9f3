"""Adoption tools (issue 8): translate a Squid configuration into policies (`squid_import`), write
Squid's access.log line format beside or instead of the JSON audit records (`squid_log`), and
learn the smallest policy set from recorded audit records (`suggest`).

Nothing here is on the request path except `squid_log.squid_line`, which the audit sink's writer
path calls once per close record when `audit.format` asks for Squid lines.
"""
