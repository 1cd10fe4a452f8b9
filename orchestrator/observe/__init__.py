"""Reading journals into runs, and what is made of them: status, metrics and
their export, reports. Never imported on the restore path before the first
kernel call.
"""
