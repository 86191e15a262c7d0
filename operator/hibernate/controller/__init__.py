"""The operator: reconciles ModelDeployments into a Deployment, a Service and pod annotations."""
