# pemworker %post ($1: 1 = install, 2 = upgrade). Creates the directories the agent writes to
# when missing. Never writes agent.cfg, certificates or the spool; never enables or starts the
# agent (it must be registered first).
[ -d /var/log/pem ] || mkdir -m 0750 /var/log/pem
[ -d /var/lib/pem ] || mkdir -m 0755 /var/lib/pem
[ -d /var/lib/pem/agent ] || mkdir -m 0700 /var/lib/pem/agent
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
