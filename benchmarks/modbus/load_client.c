/* Modbus TCP load client for the server benchmark (libmodbus, one thread per connection).
 *
 * Each thread runs a plain request/response loop (no pipelining), as SCADA clients do.
 * Build: gcc -O2 -o load_client load_client.c $(pkg-config --cflags --libs libmodbus) -lpthread
 * Usage: load_client HOST PORT CONNECTIONS SECONDS read100|write1
 * Prints: "<requests> <errors>" for the whole run.
 */
#include <errno.h>
#include <modbus.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct job {
    const char *host;
    int port;
    double seconds;
    int write;
    long requests;
    long errors;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *run(void *arg) {
    struct job *job = arg;
    uint16_t regs[125];
    modbus_t *ctx = modbus_new_tcp(job->host, job->port);
    if (ctx == NULL || modbus_connect(ctx) == -1) {
        fprintf(stderr, "connect: %s\n", modbus_strerror(errno));
        job->errors = -1;
        return NULL;
    }
    modbus_set_slave(ctx, 1);
    modbus_set_response_timeout(ctx, 2, 0);
    double end = now() + job->seconds;
    long n = 0;
    while (1) {
        int rc;
        if (job->write)
            rc = modbus_write_register(ctx, (int)(n % 100), (uint16_t)(n & 0x7FFF));
        else
            rc = modbus_read_registers(ctx, 0, 100, regs);
        if (rc == -1)
            job->errors++;
        else
            job->requests++;
        n++;
        if ((n & 63) == 0 && now() >= end)
            break;
    }
    modbus_close(ctx);
    modbus_free(ctx);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s HOST PORT CONNECTIONS SECONDS read100|write1\n", argv[0]);
        return 2;
    }
    int conns = atoi(argv[3]);
    struct job *jobs = calloc(conns, sizeof *jobs);
    pthread_t *threads = calloc(conns, sizeof *threads);
    for (int i = 0; i < conns; i++) {
        jobs[i].host = argv[1];
        jobs[i].port = atoi(argv[2]);
        jobs[i].seconds = atof(argv[4]);
        jobs[i].write = strcmp(argv[5], "write1") == 0;
        pthread_create(&threads[i], NULL, run, &jobs[i]);
    }
    long requests = 0, errors = 0;
    for (int i = 0; i < conns; i++) {
        pthread_join(threads[i], NULL);
        requests += jobs[i].requests;
        errors += jobs[i].errors;
    }
    printf("%ld %ld\n", requests, errors);
    return 0;
}
