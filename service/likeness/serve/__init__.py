"""The gRPC service: data plane (runtime), servicer, status mapping, auth, client."""
