"""Writing a plan out for another system: a systemd unit, a Kubernetes DynamoGraphDeployment.

May import: plan and below (systemd also reads engine-independent budgets from plan.policies).
"""
