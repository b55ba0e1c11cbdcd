"""Stage 3b, preflight: ``check(plan, facts) -> findings``, pure judgement of host facts against a plan.

``checks`` (the named checks and ``enforce``), ``findings`` (the finding type), ``needs`` (what a
plan needs: ports, memory, remote targets), ``gpu`` (GPU checks). May import: host and below.
"""
