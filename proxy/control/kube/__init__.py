"""Kubernetes control plane: an API client on aiohttp, reflectors with client-go's list/watch
semantics, the pod/namespace/job informers that fill the pod index, and the policy CRD source."""
