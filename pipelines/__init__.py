"""mmpipe's app: Prefect flows, deployments and the local stack, over the mmcore library."""
