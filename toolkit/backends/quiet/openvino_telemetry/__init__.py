"""Put first on a converter's PYTHONPATH (run_tool): OpenVINO, optimum-intel and NNCF import
openvino_telemetry inside try/except ImportError and fall back to their own no-op stubs, so the
tools send no usage data to Google Analytics and write nothing under ~/intel."""

raise ImportError("phikit runs OpenVINO tools without their telemetry")
