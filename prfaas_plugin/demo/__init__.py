"""`prfaas demo`: the whole PrfaaS deployment on one CPU machine (processes, link, workload, report)."""
