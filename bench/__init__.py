"""Built-in benchmark workloads and peer engines (installed as ``fastreg.bench``).

Shared by ``fastreg bench`` and the pytest-benchmark suites in this folder.
"""
