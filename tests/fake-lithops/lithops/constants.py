JOBS_PREFIX = "lithops.jobs"
