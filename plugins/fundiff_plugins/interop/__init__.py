"""Interoperability with other libraries' formats (plain modules; no component is registered here)."""
