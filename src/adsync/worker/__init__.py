"""Scale-out on Procrastinate: one sync job per account, the schedule, stalled-job recovery.

One noun per module; import from the module (nothing is loaded here, so that a
command that needs only the schedule or the settings does not load the job queue):

- :mod:`~adsync.worker.settings`: the worker's settings and the job queue's URL;
- :mod:`~adsync.worker.schedule`: cron strings and their next ticks;
- :mod:`~adsync.worker.policy`: what follows an attempt (pure), the retry backoff;
- :mod:`~adsync.worker.names`: the queues', tasks' and account locks' names;
- :mod:`~adsync.worker.jobs`: the sync jobs in the queue, read without Procrastinate;
- :mod:`~adsync.worker.queue`: deferring and enqueueing jobs, stalled-job recovery,
  the clean-up of old jobs;
- :mod:`~adsync.worker.runtime`: what a worker's jobs share;
- :mod:`~adsync.worker.tasks`: the Procrastinate app, its tasks, a sync job's attempt;
- :mod:`~adsync.worker.health`: what ``/healthz`` reports, and the checks behind it;
- :mod:`~adsync.worker.supervisor`: riding out database outages;
- :mod:`~adsync.worker.serve`: running a worker until a signal.
"""
