# pemworker %postun ($1: 0 = erase, 1 = upgrade). After an upgrade, restarts the agent if it was
# running. Leaves agent.cfg, certificates, logs and the spool (/var/lib/pem/agent) in place:
# RPM has no purge, so nothing the agent or the admin made is ever removed.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart pemagent.service >/dev/null 2>&1 || :
    fi
fi
exit 0
