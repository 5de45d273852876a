"""The cluster configurations in clusters/ (YAMLs, KubeRay manifests) and the security rules they and the code keep."""
