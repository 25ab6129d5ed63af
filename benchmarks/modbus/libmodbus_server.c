/* Reference peer for bench_server.py: a libmodbus TCP server (Debian's libmodbus-dev) with 200
 * holding registers, serving many connections from one select() loop, the way libmodbus'
 * own multi-client example does. Usage: libmodbus_server PORT; prints "ready" when listening. */
#include <errno.h>
#include <modbus.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/select.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    modbus_t *ctx = modbus_new_tcp("127.0.0.1", atoi(argv[1]));
    modbus_mapping_t *map = modbus_mapping_new(0, 0, 200, 0);
    if (ctx == NULL || map == NULL) {
        return 1;
    }
    for (int i = 0; i < 200; i++) {
        map->tab_registers[i] = (uint16_t)i;
    }
    int listener = modbus_tcp_listen(ctx, 64);
    if (listener < 0) {
        perror("listen");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    fd_set all;
    FD_ZERO(&all);
    FD_SET(listener, &all);
    int maxfd = listener;
    uint8_t query[MODBUS_TCP_MAX_ADU_LENGTH];
    for (;;) {
        fd_set ready = all;
        if (select(maxfd + 1, &ready, NULL, NULL, NULL) < 0) {
            if (errno == EINTR) {
                continue;
            }
            return 1;
        }
        for (int fd = 0; fd <= maxfd; fd++) {
            if (!FD_ISSET(fd, &ready)) {
                continue;
            }
            if (fd == listener) {
                int s = listener;
                int conn = modbus_tcp_accept(ctx, &s);
                if (conn >= 0) {
                    FD_SET(conn, &all);
                    if (conn > maxfd) {
                        maxfd = conn;
                    }
                }
                continue;
            }
            modbus_set_socket(ctx, fd);
            int rc = modbus_receive(ctx, query);
            if (rc > 0) {
                modbus_reply(ctx, query, rc, map);
            } else if (rc == -1) {
                close(fd);
                FD_CLR(fd, &all);
            }
        }
    }
}
