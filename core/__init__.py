"""Shared runtime of the face-generation demo suite: weights, devices, face input, meshes, networks."""
